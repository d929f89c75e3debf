//! The topic half of the data contract: one topic per entity, the record each
//! carries, and the registry subject of its values; and [`AnyRecord`], a
//! record of any entity. Both come from the one list of entities at the end
//! of this file: a new entity is one line there (and its record).

use crate::codec::Codec;
use crate::error::{DecodeError, EncodeError};
use crate::field::Value;
use crate::record::{CompiledSchema, Record};
use crate::records::{Asset, Candle, DeadLetter, Exchange, Market, Price, Rate, Source, Trade};
use crate::validate::Rules;
use crate::Micros;

/// Declares [`Topic`] and [`AnyRecord`] from the list of entities: each
/// with its topic variant, topic name, record variant, how the record is
/// held (the larger ones boxed, so that an `AnyRecord` is the size of a
/// trade, the most frequent one), and its meaning check in [`Rules`].
macro_rules! entities {
    ($( $topic:ident $name:literal => $variant:ident($held:ty) : $record:ty, $check:ident; )*) => {
        /// One entity topic.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Topic {
            $( $topic, )*
        }

        impl Topic {
            /// Every topic, in a stable order.
            pub const ALL: [Topic; [$( Topic::$topic, )*].len()] = [$( Topic::$topic, )*];

            /// The topic name without prefix.
            pub fn base_name(self) -> &'static str {
                match self {
                    $( Topic::$topic => $name, )*
                }
            }

            /// The compiled-in schema of its values.
            pub fn schema(self) -> &'static CompiledSchema {
                match self {
                    $( Topic::$topic => <$record>::compiled(), )*
                }
            }

            /// Decodes a framed value of this topic's record.
            pub fn decode(self, codec: &Codec, payload: &[u8]) -> Result<AnyRecord, DecodeError> {
                Ok(match self {
                    $( Topic::$topic => AnyRecord::$variant(codec.decode::<$record>(payload)?.into()), )*
                })
            }
        }

        /// A record of any entity.
        #[derive(Debug, Clone, PartialEq)]
        pub enum AnyRecord {
            $( $variant($held), )*
        }

        impl AnyRecord {
            /// The entity topic it belongs to.
            pub fn topic(&self) -> Topic {
                match self {
                    $( AnyRecord::$variant(_) => Topic::$topic, )*
                }
            }

            /// The Kafka message key, per the data contract.
            pub fn key(&self) -> String {
                match self {
                    $( AnyRecord::$variant(r) => { let r: &$record = r; r.key() }, )*
                }
            }

            /// The exchange's event time.
            pub fn event_time(&self) -> Micros {
                match self {
                    $( AnyRecord::$variant(r) => r.event_time, )*
                }
            }

            /// Sets when tickpipe received it.
            pub fn set_ingest_time(&mut self, t: Micros) {
                match self {
                    $( AnyRecord::$variant(r) => r.ingest_time = t, )*
                }
            }

            /// Where it came from.
            pub fn source(&self) -> Source {
                match self {
                    $( AnyRecord::$variant(r) => r.source, )*
                }
            }

            /// Every field by name, in schema order.
            pub fn values(&self) -> Vec<(&'static str, Value<'_>)> {
                match self {
                    $( AnyRecord::$variant(r) => { let r: &$record = r; r.values() }, )*
                }
            }

            /// The meaning checks the schema cannot express.
            pub fn validate(&self, rules: &Rules) -> Result<(), String> {
                match self {
                    $( AnyRecord::$variant(r) => rules.$check(r), )*
                }
            }

            /// The framed record, as `codec` writes it.
            pub fn encode(&self, codec: &Codec) -> Result<Vec<u8>, EncodeError> {
                match self {
                    $( AnyRecord::$variant(r) => { let r: &$record = r; codec.encode(r) }, )*
                }
            }

            /// Appends the framed record to `out` and returns its key.
            pub fn encode_into(&self, codec: &Codec, out: &mut Vec<u8>) -> Result<String, EncodeError> {
                match self {
                    $( AnyRecord::$variant(r) => {
                        let r: &$record = r;
                        codec.encode_into(r, out)?;
                        Ok(r.key())
                    } )*
                }
            }
        }

        $(
            impl From<$record> for AnyRecord {
                fn from(r: $record) -> Self {
                    AnyRecord::$variant(r.into())
                }
            }
        )*
    };
}

entities! {
    Assets "assets" => Asset(Box<Asset>): Asset, asset;
    Rates "rates" => Rate(Rate): Rate, rate;
    Exchanges "exchanges" => Exchange(Exchange): Exchange, exchange;
    Markets "markets" => Market(Box<Market>): Market, market;
    Prices "prices" => Price(Price): Price, price;
    Trades "trades" => Trade(Trade): Trade, trade;
    Candles "candles" => Candle(Box<Candle>): Candle, candle;
    DeadLetters "dead-letters" => DeadLetter(Box<DeadLetter>): DeadLetter, dead_letter;
}

impl Topic {
    /// The topic name with the pipeline's prefix (which may be empty), e.g. `dev.trades`.
    pub fn name(self, prefix: &str) -> String {
        format!("{prefix}{}", self.base_name())
    }

    /// The Schema Registry subject of its values (TopicNameStrategy).
    pub fn value_subject(self, prefix: &str) -> String {
        format!("{}-value", self.name(prefix))
    }

    /// The topic for a base name (without prefix).
    pub fn from_base_name(name: &str) -> Option<Topic> {
        Topic::ALL.into_iter().find(|t| t.base_name() == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_of_any_entity_is_the_size_of_a_trade() {
        // The most frequent record moves between reader and writer by value.
        assert!(
            std::mem::size_of::<AnyRecord>() <= std::mem::size_of::<Trade>() + 8,
            "AnyRecord is {} bytes, a Trade {}",
            std::mem::size_of::<AnyRecord>(),
            std::mem::size_of::<Trade>()
        );
    }

    #[test]
    fn every_topic_has_its_name_and_schema() {
        for topic in Topic::ALL {
            assert_eq!(Topic::from_base_name(topic.base_name()), Some(topic));
            assert!(topic.schema().name.starts_with("tickpipe."), "{topic:?}");
        }
    }
}
